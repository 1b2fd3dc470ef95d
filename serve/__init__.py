"""Ray Serve: ``app`` builds the application from ``config`` (one encoder deployment per model in
``deployments``, the catalogue deployment in ``catalog``, the ``ingress``); ``http`` is the HTTP
API itself, with no Ray in it; ``launch`` starts and stops it for the command line."""
