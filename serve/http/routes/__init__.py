"""One router per route group; ``mmembed.serve.http.app.create_app`` includes them all."""
