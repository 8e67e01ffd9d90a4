"""The time-to-quality benchmark: ``protocol`` (contenders, cells, ladder, analysis), ``runner``
(launching runs and the stages that fill the JSON), ``report`` (tables, figure) and ``cli``
(``python benchmarks/ttq_protocol.py``). Each imports only those before it in that order."""
