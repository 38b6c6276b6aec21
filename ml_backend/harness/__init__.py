"""The local harness the demo, the tests and the benchmarks share.

Nothing here is part of the served backend: these modules start a real Label Studio
(`label_studio_server`) and a real `ls-rlhf serve` (`backend_process`) as child processes
on loopback, and play the person in the loop (`simulated_annotator`). Kept apart from
`training.label_studio_client` (the one Label Studio client) and `ml_backend.serving`
(what the backend serves), whose names they used to echo.
"""
