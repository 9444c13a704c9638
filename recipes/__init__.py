"""The shipped recipe files. Installed as the package data `lptrain.recipe_files` (see
pyproject.toml), so `lptrain recipes` lists them from a wheel as well as from a checkout."""
