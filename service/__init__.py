"""The web service: FastAPI app serving many domains from one backbone (see `service.app.create_app`)."""
