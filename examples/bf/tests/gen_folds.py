#!/usr/bin/env python3
"""Writes a Brainfuck program of random nested counted loops (seeded, deterministic) for the
loop folding tests: adds, clears, sets, multiply loops, loops whose counter starts at an
unknown value, counters stepping by +1, -1 and -2, loops reading cells their body changes,
and an occasional output inside a loop (never foldable). Every case clears a window of
cells, runs one loop nest and prints the window. Termination: a counter is only changed by
its own step; outer counters start at small known values, and a -2 step at an even one.
Usage: gen_folds.py SEED CASES > PROGRAM.b  (expected output: make_expected.py PROGRAM.b)"""
import random, sys

rng = random.Random(int(sys.argv[1]))
cases = int(sys.argv[2])
W = 7  # window: cells 0 .. W-1
out = []
pos = 0


def move(to):
    global pos
    out.append(('>' if to > pos else '<') * abs(to - pos))
    pos = to


def add(v):
    v %= 256
    out.append('+' * v if v <= 128 else '-' * (256 - v))


def loop(c, depth, forbidden):
    """A loop with its counter at cell c (the pointer is there)."""
    step = rng.choice([-1, -1, -1, 1, -2]) if depth < 2 else rng.choice([-1, 1])
    preset = depth < 2 or step == -2 or rng.random() < 0.5
    if preset:
        out.append('[-]')
        n = rng.randint(1, 4 if depth < 2 else 6)
        add(2 * n if step == -2 else (n if step < 0 else -n))
    out.append('[')
    free = [x for x in range(W) if x not in forbidden and x != c]
    pieces = rng.randint(1, 4)
    dec_at = rng.randint(0, pieces)
    for i in range(pieces + 1):
        if i == dec_at:
            move(c)
            add(step)
        if i == pieces or not free:
            continue
        t = rng.choice(free)
        kind = rng.random()
        move(t)
        if kind < 0.35:
            add(rng.choice([1, 2, 3, 5, 7, 255, 254, 250, 128]))
        elif kind < 0.55:
            out.append('[-]')
            add(rng.randint(0, 9))
        elif kind < 0.92 and depth < 3:
            loop(t, depth + 1, forbidden | {c})
        elif depth < 1:
            out.append('.')
        else:
            add(1)
    move(c)
    out.append(']')


for case in range(cases):
    for x in range(W):
        move(x)
        out.append('[-]')
        add(rng.randint(0, 255) if rng.random() < 0.5 else rng.randint(0, 3))
    c = rng.randrange(W)
    move(c)
    loop(c, 0, set())
    for x in range(W):
        move(x)
        out.append('.')
    out.append('\n')
move(0)
print(''.join(out))
