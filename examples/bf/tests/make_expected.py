#!/usr/bin/env python3
"""Expected outputs, computed independently of jitpatch-bf: each program is translated
command by command to C (no optimization) and compiled with cc; the binary runs with the
test's input. Usage: make_expected.py PROGRAM.b [INPUT] [--eof=zero|minus1] > EXPECTED"""
import os, subprocess, sys, tempfile

args = [a for a in sys.argv[1:] if not a.startswith('--eof=')]
eof = next((a[6:] for a in sys.argv[1:] if a.startswith('--eof=')), 'unchanged')
src = open(args[0]).read()
on_eof = {'unchanged': '', 'zero': '*p=0;', 'minus1': '*p=255;'}[eof]
body = {'>': '++p;', '<': '--p;', '+': '++*p;', '-': '--*p;', '.': 'putchar(*p);',
        ',': '{int c=getchar();if(c!=EOF)*p=(unsigned char)c;else{%s}}' % on_eof,
        '[': 'while(*p){', ']': '}'}
c = ('#include <stdio.h>\nstatic unsigned char t[1<<20];\n'
     'int main(void){unsigned char*p=t+4096;' + ''.join(body[ch] for ch in src if ch in body) + 'return 0;}\n')
with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, 'p.c'), 'w').write(c)
    subprocess.check_call(['cc', '-O1', '-o', os.path.join(d, 'p'), os.path.join(d, 'p.c')])
    stdin = open(args[1], 'rb') if len(args) > 1 else subprocess.DEVNULL
    sys.stdout.buffer.write(subprocess.run([os.path.join(d, 'p')], stdin=stdin, check=True, stdout=subprocess.PIPE).stdout)
