"""``optforge compare``: train a model with several optimizers and compare them, with intervals.

From Python::

    import optforge.compare as oc

    results = oc.run("digits", optimizers="adam,adamw,sgd", seeds=3, steps=500)
    results["summary"]["optimizers"]["adamw"]["vs_baseline"]   # paired difference to adam

- :mod:`.tasks`: :class:`Task` (``from_tensors``, ``from_datasets``), :class:`Metric`, loading
  a user's task; :mod:`.builtin` and :mod:`.text`: the built-in tasks
- :mod:`.options`: parsing of optimizer lists (wildcards), ``--lr``, ``--optimizer_args``, ``--seeds``
- :mod:`.runner`: the seeded training loop of one run
- :mod:`.tuning`: ``--tune --budget K``: search spaces and quasi-random trials
- :mod:`.stats`: bootstrap intervals over seeds and test examples, supported rank ranges
- :mod:`.provenance`: command, versions, machine, git commit
- :mod:`.report`: the table, ``results.json``, ``curves.png``, merging saved runs
- :mod:`.api`, :mod:`.session`: :func:`run` and one comparison's steps; :mod:`.cli`: the command
"""

from .api import run
from .tasks import Metric, Task

__all__ = ["Metric", "Task", "run"]
