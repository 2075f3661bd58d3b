"""Evaluation: multi-view scoring on Ray, the benchmark catalog, the ledger of results in MLflow,
scheduled re-evaluation and the leaderboard.

    model_refs   reference (models:/, runs:/, path) -> weights, architecture, class names
    catalog      versioned benchmark YAML, protocols, content and protocol hashes
    labels       matching label spaces by class name
    multiview    Ray Data batch inference: decode actors -> model actors -> per-video scores
    metrics      top-1/top-5, class accuracies, confusion matrix, predictions table
    runner       one (checkpoint, benchmark) pair, recorded as an MLflow run
    results      which pairs have a FINISHED result (read from MLflow)
    schedule     re-evaluate every missing pair, then the leaderboard
    leaderboard  Markdown / HTML table, one row per model version
"""
