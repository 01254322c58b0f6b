"""The protocols at the edge: each parses its bodies into the pipeline's instances and renders completions in its own shapes."""
