"""The Parametric Memory Law, dL = C x^alpha l^-beta + b (docs/method.md §5): `memcli fit` and `memcli plan`.

    points.py      the law's terms (law_value, COEFFICIENTS, LawError) and the runs: sweep and run folders,
                   summary.json (through memcli.runs), CSV/JSONL tables; the saturation split; check_fittable
    projection.py  the variable-projection least-squares solver
    fit.py         fit_law (bootstrap intervals, R^2, MAPE, extrapolation check), LawFit and law.json
                   (save_law, load_law), fit_and_save (`memcli fit` without the printing)
    plan.py        predict, plan, Plan and its sentence, plan_from_file (`memcli plan` without the printing)
    plots.py       pred_vs_obs.png and delta_l_vs_l.png

Imports run one way: the others import points; fit imports projection and plots; plan imports fit. The printing
(print_fit, print_plan) is in memcli.terminal.
"""
