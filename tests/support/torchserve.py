"""The product's process tree for the tests: the launcher is ``bench.launcher``, which the benchmark starts too."""

from bench.launcher import (
    ROOT,
    TorchServe,
    app_model_config,
    build_archive,
    continuous_model_config,
    dynamic_model_config,
    post,
    process_tree,
    serving_both_paths,
    start_app,
)

__all__ = [
    "ROOT",
    "TorchServe",
    "app_model_config",
    "build_archive",
    "continuous_model_config",
    "dynamic_model_config",
    "post",
    "process_tree",
    "serving_both_paths",
    "start_app",
]
