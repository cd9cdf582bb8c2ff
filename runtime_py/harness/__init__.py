"""On-device validation harness: numerics and speed of a bundle on the host, Android phones and Apple devices.

    record.py    the result record (one JSON per run) and the host's environment info
    host.py      the host: every reference-runtime backend, each in its own worker process
    android.py   Android over adb: runner command lines, on-device hygiene, Tensor NPU AOT compilation
    apple.py     mac (Core ML per compute unit, MLComputePlan) and iphone (xcrun devicectl)
    parsers.py   readers of the on-device tools' outputs
    numerics.py  golden-vector comparison and limits
    history.py   the SQLite history and the regression flag
    report.py    report.md and the PNG plots
    cli.py       `g3n harness run` / `g3n harness history` (add_parsers, run)
"""
