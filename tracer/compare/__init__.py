"""Compare a trace against its golden: metrics, tolerances, localization, diagnosis (SPEC §6).

The comparator knows nothing about how a trace was made: it reads two files and, where the
golden carries weights, re-evaluates single stages to tell error introduced from error inherited.
"""
