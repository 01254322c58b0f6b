"""Schedulers: prompts in, completions out, behind one interface (`base.Scheduler`), and the one routing rule."""
