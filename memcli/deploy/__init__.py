"""The files users ship and their certification; torch-free. `train --deploy` and `verify --deploy` both use it.

- `forms`: both deployment forms of a type (merged; adapter over the quantised base) and the ollama Modelfile.
- `certify`: the one certifier: every form made from a run's adapter, scored in llama.cpp, one row per form.
"""
