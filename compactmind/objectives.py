"""The objectives a study can optimise, declared once: name -> direction ("minimize" or "maximize"). A trial
records each under its name; samplers, `best`, the Pareto front, early stopping and reports read the direction
from here (or from the study, which stores it), so a higher-is-better quality figure (a zero-shot accuracy) is
one more entry, not edits in six files.
"""

OBJECTIVES = {
    "perplexity": "minimize",
    "compression_ratio": "maximize",
    # peak memory of the trial's evaluation: allocated by torch on a GPU; on the CPU the process's resident peak
    # (model, snapshot and activations), so candidates differ only by what really changes size
    "peak_memory_bytes": "minimize",
    # dynamic studies choose on selection windows of validation text, never on the test windows
    "selection_perplexity": "minimize",
    "selection_kl": "minimize",  # mean KL divergence from the dense model's next-token distributions
}
# The quality objective of a study: what `best` minimises among feasible trials (test perplexity for a static
# study; the fitness on selection windows for a dynamic one, whose chosen trials are then measured on the test).
QUALITY = {"ppl": "selection_perplexity", "kl": "selection_kl"}
QUALITY_OBJECTIVES = ("perplexity", *QUALITY.values())  # the objectives a trial's quality can be measured by
