"""Run the admission front before a TorchServe inference API (imagerec/front.py says why).

    python scripts/front.py --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8090

``scripts/serve.py`` (through ``TorchServe(front=True)``) starts it; run it by hand only to put it
before a TorchServe started otherwise. ``--help`` lists the limits. Exit codes: 0 stopped by a
signal, 2 bad arguments.
"""

from imagerec.front import cli

if __name__ == "__main__":
    cli()
