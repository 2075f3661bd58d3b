"""Architecture search with Ray Tune: one Ray Train run per trial, ASHA early stopping.

space   search-space YAML -> validated axes -> trial configurations with params and GMACs
search  the Tune driver: concurrency from the cluster, ASHA, MLflow parent run, resume
report  trials ranked by Pareto front of (GMACs, val top-1): CSV, Markdown, PNG
"""
