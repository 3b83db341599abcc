"""Starting runs from Python: the launch scripts' pre-check (``precheck``, called by
``launch/*.sh``) and sweeps of many runs (``sweep``)."""
