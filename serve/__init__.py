"""Ray Serve deployments and the HTTP ingress (upcoming)."""
