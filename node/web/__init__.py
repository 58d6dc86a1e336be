"""The node's HTTP side: dashboard pages, the REST API (with its OpenAPI spec), /metrics, /healthz, /readyz.

``app`` builds the FastAPI application, ``server`` runs it with uvicorn in a thread of the node's process,
``auth`` decides who may use it, ``data`` reads what the pages and the API show.
"""
