#!/usr/bin/env python3
"""Expected outputs of the jitpatch-calc tests, computed without jitpatch-calc: Python's
own expression evaluation with 64-bit wrap-around, printed as signed.

  examples/calc/tests/make_expected.py FILE.calc > FILE.out
"""
import sys

M = 1 << 64


def signed(v):
    v %= M
    return v - M if v >= M // 2 else v


def main():
    f = None
    for line in open(sys.argv[1]):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, rest = line.split(None, 1)
        if word == "def":
            f = compile(rest, "calc", "eval")
        elif word == "sum":
            total = sum(eval(f, {"x": x}) for x in range(int(rest)))
            print(signed(total))


main()
