"""The Parametric Memory Law, dL = C x^alpha l^-beta + b (docs/method.md §5); its printing is memcli.cli.terminal.

- `points`: the law's terms and the runs it is fitted on (sweeps, run folders, tables); the saturation split.
- `projection`: the variable-projection least-squares solver.
- `fit`: `memcli fit`: bootstrap intervals, R^2, MAPE, the held-out check, law.json.
- `plan`: `memcli plan`: the smallest capacity a corpus needs, its interval and the train command.
- `probe`: `memcli plan --probe`: the law fitted on a small sweep over nested prefixes of the user's corpus.
- `plots`: pred_vs_obs.png and delta_l_vs_l.png.
"""
