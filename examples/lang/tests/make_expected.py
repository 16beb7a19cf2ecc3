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


def logic_out():
    # true/false are 1/0; a && b is a if a is false else b; a || b is a if a is true else b.
    out = [1, 0, 1, 1, 1, 0, 1, 0, 3, 0, 9, 4, 'nil', 'nil', 0]
    n, calls = 0, 0
    for i in range(100):
        if (i % 3 == 0 and i % 5 == 0) or i == 7:
            n += 1
        if not i < 50:
            if i % 2 == 0:
                n += 100
            else:
                calls += 1  # side(0) is evaluated and false
    out += [n, calls]
    def clamp(x):  # (x < 0 && 0) || (x > 10 && 10) || x: 0 is false, so only 10 or x
        return 10 if x > 10 else x
    out += [clamp(-5), clamp(50), clamp(7), 42, 1]
    return out


def arrays_out():
    out = [3, 1 + 2 * 3, 20, 0, 'nil', 14]
    flags = [True] * 5001
    count = 0
    for i in range(2, 5001):
        if flags[i]:
            count += 1
            for k in range(2 * i, 5001, i):
                flags[k] = False
    out.append(count)
    m = [[i * 6 + j for j in range(6)] for i in range(6)]
    out += [sum(m[i][5 - i] for i in range(6)), m[5][5]]
    out.append(sum(x * 10 + y for x, y in [(1, 2), (3, 4), (6, 5)]))
    out += [11, 3, 99, 1, 0, '<array>', 0, 1, 4, 1]
    return out


def methods_out():
    out = [6, 5 * 6, 5]
    out.append(10 * (1 * 2 + 5 * 5 + 2 * 1 + 3 * 3))
    out.append(5 * 20 + 5 * 40)
    out += [10, 15, sum(range(1, 51)), '<function area>', 1, 0, 1, 121]
    balls = []
    for i in range(100):
        seed = i * 74755 % 65536 + 1
        balls.append([seed * 37 % 500, seed * 91 % 500, seed % 300 - 150, seed * 7 % 300 - 150])
    bounces = 0
    for _ in range(50):
        for b in balls:
            hit = False
            b[0] += b[2]
            b[1] += b[3]
            if b[0] > 500: b[0] = 500; b[2] = -b[2]; hit = True
            if b[0] < 0: b[0] = 0; b[2] = -b[2]; hit = True
            if b[1] > 500: b[1] = 500; b[3] = -b[3]; hit = True
            if b[1] < 0: b[1] = 0; b[3] = -b[3]; hit = True
            bounces += hit
    out.append(bounces)
    return out


def gc_stress_out():
    def rnd(s):
        return (s * 1309 + 13849) % 65536

    class Node:
        __slots__ = ('v', 'next')

        def __init__(self, v, nxt):
            self.v, self.next = v, nxt

    def build(n, seed):
        lst = None
        for i in range(n):
            lst = Node((seed + i * 7) % 1000, lst)
        return lst

    def lsum(lst):
        s = 0
        while lst:
            s, lst = s + lst.v, lst.next
        return s

    def tree(d, v):
        t = {'v': v}
        if d > 0:
            t['l'] = tree(d - 1, v * 2 % 1009)
            t['r'] = tree(d - 1, (v * 2 + 1) % 1009)
        t['w'] = v + d
        return t

    def tsum(t):
        if not t:
            return 0
        return (t['v'] + t['w'] + tsum(t.get('l')) + tsum(t.get('r'))) % 1000000007

    seed = 42
    table = [build(50, i) for i in range(64)]
    forest, big, check = tree(8, 1), [1] * 3000, 0
    for _ in range(10000):
        seed = rnd(seed)
        k = seed // 16 % 64
        seed = rnd(seed)
        op = seed // 128 % 6
        if op == 0:
            table[k] = build(20 + seed % 40, seed)
        elif op == 1:
            if table[k]:
                table[k] = table[k].next
        elif op == 2:
            table[k] = Node(seed % 1000, table[(k + 1) % 64])
        elif op == 3:
            tmp = [{'a': j, 'b': [j, j + seed % 7]} for j in range(10)]
            check = (check + tmp[seed % 10]['b'][1] + tmp[3]['a']) % 1000000007
        elif op == 4:
            if seed % 50 == 0:
                forest = tree(6, seed % 1009)
            big[seed % 3000] = seed
        elif seed % 200 == 0:
            check = (check + big[seed % 3000]) % 1000000007
            big = [seed % 5] * 3000
    total = 0
    for i in range(64):
        total = (total + lsum(table[i]) * (i + 1)) % 1000000007
    return [total, check, tsum(forest), sum(big) % 1000000007]


def recompile_out():
    return [sum(range(20000)) % 1000000007]


for name, f in [('fib', fib_out), ('loops', loops_out), ('ic_poly', ic_poly_out), ('props', props_out),
                ('calls', calls_out), ('logic', logic_out), ('arrays', arrays_out), ('methods', methods_out),
                ('gc_stress', gc_stress_out), ('recompile', recompile_out)]:
    with open(name + '.out', 'w') as fh:
        fh.write(''.join(f'{v}\n' for v in f()))
