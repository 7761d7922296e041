"""Generated wire contract, package ``fedrecon.v1`` (from protos/fedrecon/v1/*.proto).

The modules beside this file are written by grpcio-tools when the package is built (setup.py); they are
not committed and never edited by hand. ``python setup.py build_py`` or any (editable) install regenerates
them.
"""
