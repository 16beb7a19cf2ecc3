#!/usr/bin/env python3
"""Expected outputs of the jitpatch-lang test programs, computed independently (plain
Python transcriptions of what each program computes, not an interpreter of the language).
Run from this directory: python3 make_expected.py  (writes NAME.out)."""


def tdiv(a, b):  # division truncating toward zero, as C
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def tmod(a, b):  # remainder with the dividend's sign, as C
    return a - tdiv(a, b) * b


def fib_out():
    def fib(n):
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a
    return [fib(i) for i in range(25)] + [900]


def loops_out():
    out = []
    total = 0
    for i in range(-7, 8):
        for j in range(-3, 4):
            if j != 0:
                total += tdiv(i * 100 + j, j) + tmod(i * 37, j)
    out.append(total)
    def collatz(n):
        s = 0
        while n != 1:
            n = n // 2 if n % 2 == 0 else 3 * n + 1
            s += 1
        return s
    best, arg = 0, 0
    for n in range(1, 3000):
        s = collatz(n)
        if s > best:
            best, arg = s, n
    out += [arg, best]
    out.append(-1 * 100 + 0 * 10 + 1)
    out.append(1 + 1 + 0 + 0 + 1 + 0)
    out.append(42)
    out.append(1)  # total == 0 + total
    big = 2**62 - 1
    out += [big, -big - 1, tdiv(-big, 1000000007), tmod(-big, 1000000007)]
    return out


def ic_poly_out():
    out = []
    for _ in range(3):
        for k in range(5):
            x = 10 ** k
            s = 0
            for _ in range(20):
                s += x
                x += k
            out += [s, x]
    out.append(50 * 1 + 50 * 10)
    return out


def props_out():
    out = [sum(i * i for i in range(1, 101)), 100 * 100, 98 * 98, 'nil', 3, 2, '<object>', 5, 1, 0, 1,
           sum(range(50)), 'nil']
    return out


def calls_out():
    from math import gcd

    def ack(m, n):
        if m == 0:
            return n + 1
        if n == 0:
            return ack(m - 1, 1)
        return ack(m - 1, ack(m, n - 1))
    acc = sum(2 * i + 4 * i + gcd(i * 12, 90) for i in range(200))
    return [acc, 0, 1, ack(2, 3), ack(3, 3), 'nil', gcd(1071, 462)]


for name, f in [('fib', fib_out), ('loops', loops_out), ('ic_poly', ic_poly_out), ('props', props_out),
                ('calls', calls_out)]:
    with open(name + '.out', 'w') as fh:
        fh.write(''.join(f'{v}\n' for v in f()))
