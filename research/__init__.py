"""Research tooling beside the package (not in the wheel): the studies (`python -m research.study`,
`python -m research.study_llm`) and the benchmarks (`python -m research.bench`, `make bench`). Run from
the checkout's root; they import the installed `epo_trl` and write under docs/."""
