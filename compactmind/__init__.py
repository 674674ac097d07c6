"""compactmind: automatic search over LLM compression pipelines (pruning, quantization, hybrids) on Optuna.

Layout, imports running one way (cli -> study -> executor -> pipeline -> methods/registry -> models/data):
  cli/              argparse (parser), commands, printing and progress bars (console)
  config            RunConfig (every setting, validated once) and the objectives a study can optimise
  study/            the Optuna layer: storage, sampler (grid + strategy table), objective (one trial's life),
                    session (create/resume, dense baseline, run loop, reports), records (typed read-back)
  executor          the executor every command uses: load, restore, apply, measure, evaluate
  pipeline          pipeline text, candidate lists, applying steps
  registry, space, methods/   compression methods as plugins with typed search spaces
  formats, footprint          how each weight is stored (one ledger per module) and what it costs
  models, data, calibration, evaluate   loading, tokenized windows, the layer-by-layer loop, perplexity
  dynamic, allocations                  dynamic compression: units, level database, baselines
  report, dashboard, packed, deploy/    what a person reads, watches and deploys (study/export: the command)
"""

from compactmind.errors import CompactMindError
from compactmind.registry import Kind, Method, register_method
from compactmind.space import Categorical, Float, Int

__version__ = "0.1.0"
__all__ = ["Categorical", "CompactMindError", "Float", "Int", "Kind", "Method", "register_method"]
