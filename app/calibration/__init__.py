"""Calibration of correctness probes: metrics with their estimators named, and report rendering.

`values` holds the typed results; `scoring` accuracy, AUROC, AUPRC, Brier score and log
loss; `selective` the risk–coverage curve, AURC and PRR; `binned` the binned ECE family;
`smooth` smooth ECE; `table` the one table of reported metrics and their interval
methods; `bootstrap` their vectorised bootstrap and the binned errors' jackknife;
`intervals` the percentile, BCa and basic intervals; `reporting` builds a
`calibration_report` or `paired_differences`; `rendering` draws a report and writes its page.
The gateway imports `values` (the report schemas name its estimator kinds) and, when a
picture is asked for, `rendering`; `values` imports nothing but the standard library.
"""
