"""The web service: FastAPI app serving many domains from one backbone (see `service.frontend.app.create_app`)."""
