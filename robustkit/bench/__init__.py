"""The benchmark runner behind ``robustkit bench``: the paper's comparison in one command (DESIGN.md §6).

>>> from robustkit.bench import preset, plan
>>> [cell.trainer.label for cell in plan(preset("quick"))]
['standard', 'pgd', 'verifiable-symbolic', 'verifiable-interval', 'mixtrain']
"""

from robustkit.bench.config import BenchConfig, EvaluationSettings, TrainerSpec, load_config, parse_config, preset
from robustkit.bench.presets import PRESETS
from robustkit.bench.runner import BenchRun, Cell, CellOutcome, plan, run_bench

__all__ = [
    "PRESETS", "BenchConfig", "BenchRun", "Cell", "CellOutcome", "EvaluationSettings", "TrainerSpec", "load_config",
    "parse_config", "plan", "preset", "run_bench",
]
