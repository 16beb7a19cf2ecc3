# Writes the large hostile inputs of the jitpatch-lang tests into OUT (run once, as the
# setup fixture of those tests; too large to keep in the repository). string(REPEAT) and
# a two-level template keep this fast: cmake loops are slow.
#   elseif.lang   an `else if` chain of 40,000 links (the parser once recursed per link)
#   props.lang    100,000 properties added to one object (shapes once copied their names)
#   bigfn.lang    a function of 5,000 statements (too large for a 64 KiB code heap)
file(MAKE_DIRECTORY ${OUT})

string(REPEAT " else if (x == 1) { print(1); }" 40000 _links)
file(WRITE ${OUT}/elseif.lang
     "let x = 7;\nif (x == 0) { print(0); }${_links} else { print(x); }\nprint(2);\n")

# 100 statements o.pXX_0 .. o.pXX_99, then 1000 copies with XX = 0..999.
set(_block "")
foreach(j RANGE 0 99)
  string(APPEND _block "o.pXX_${j} = XX;\n")
endforeach()
# (string(APPEND), not a list: the statements contain ';'.)
set(_src "let o = {};\n")
foreach(i RANGE 0 999)
  string(REPLACE "XX" "${i}" _b "${_block}")
  string(APPEND _src "${_b}")
endforeach()
string(APPEND _src "print(o.p0_0 + o.p500_50 + o.p999_99);\nlet q = {};\nq.p999_99 = 5;\nprint(q.p999_99);\nprint(q.p0_0);\n")
file(WRITE ${OUT}/props.lang "${_src}")

string(REPEAT "  x = x + 1;\n" 5000 _body)
file(WRITE ${OUT}/bigfn.lang "fn big(x) {\n${_body}  return x;\n}\nfn small(x) { return x + 1; }\nprint(big(0));\nprint(small(big(1)));\n")
