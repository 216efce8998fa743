"""``python -m locedit.problems [limit]``: run (and cache) the correctness filter on the vendored CounterFact facts and print
how many the embedded model knows."""

from locedit.problems.filters import _main

_main()
