#!/usr/bin/env python3
"""Random jitpatch-lang programs for the differential tests (each tier must print what the
interpreter prints): python3 gen_programs.py SEED > gen/sSEED.lang. Objects of four shapes
(the same four properties added in different orders) meet at shared property sites."""
import random, sys
seed = int(sys.argv[1]); r = random.Random(seed)
vars_ = ['a', 'b', 'c']
props = ['p', 'q', 'r', 's']
def expr(d=0):
    k = r.randrange(9 if d < 3 else 3)
    if k == 0: return str(r.randrange(-20, 50)).replace('-', '0 - ')
    if k == 1: return r.choice(vars_)
    if k == 2: return r.choice(['o1', 'o2']) + '.' + r.choice(props)
    if k in (3, 4, 5): return '(' + expr(d+1) + ' ' + r.choice(['+', '-', '*', '<', '<=', '>', '>=', '==', '!=']) + ' ' + expr(d+1) + ')'
    if k == 6: return 'h(' + expr(d+1) + ', ' + expr(d+1) + ')'
    if k == 7: return '(' + expr(d+1) + ' / ' + '(' + expr(d+1) + ' * 0 + ' + str(r.randrange(1, 9)) + '))'
    return 'g(' + r.choice(['o1', 'o2', 'mk(' + str(r.randrange(4)) + ')']) + ')'
def stmt(d=0):
    k = r.randrange(6 if d < 2 else 4)
    if k == 0: return f'{r.choice(vars_)} = {expr()} % 100000;'
    if k == 1: return f'{r.choice(["o1","o2"])}.{r.choice(props)} = {expr()} % 100000;'
    if k == 2: return f'print({expr()});'
    if k == 3: return f'if ({expr()}) {{ {stmt(d+1)} }} else {{ {stmt(d+1)} }}'
    if k == 4: return f'let i{d} = 0; while (i{d} < {r.randrange(1,6)}) {{ {stmt(d+1)} {stmt(d+1)} i{d} = i{d} + 1; }}'
    return f'o{r.randrange(1,3)} = mk({r.randrange(4)});'
print('''fn mk(k) { let o = {}; if (k == 0) { o.p = 1; o.q = 2; o.r = 3; o.s = 4; } if (k == 1) { o.q = 3; o.p = 4; o.s = 1; o.r = 9; }
 if (k == 2) { o.r = 5; o.s = 6; o.p = 7; o.q = 11; } if (k == 3) { o.s = 8; o.r = 1; o.q = 2; o.p = 3; } return o; }
fn g(o) { return o.p; }
fn h(x, y) { if (x < y) { return y - x; } return x - y + 1; }
fn body(a, b, c, o1, o2) {''')
for _ in range(12): print(stmt())
print('return a + b + c; }')
print('let n = 0; let t = 0; while (n < 6) { let r = body(n, 1, 2, mk(n % 4), mk((n + 1) % 4)); if (r != nil) { t = t + r % 1000; } n = n + 1; } print(t);')
