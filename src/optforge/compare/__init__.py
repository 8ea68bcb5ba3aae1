"""``optforge compare``: train small models on real data with several optimizers.

- :mod:`.tasks`: data sets that ship in packages (linear, digits, mnist1d) and their models
- :mod:`.options`: parsing of optimizer lists, ``--lr``, ``--optimizer_args``, ``--seeds``
- :mod:`.runner`: the seeded training loop of one run, and the lr sweep of ``--tune``
- :mod:`.report`: the terminal table, ``results.json`` and ``curves.png``
- :mod:`.cli`: the command's arguments and the loop over optimizers and seeds
"""
