"""The engine process: the engine core and the server that feeds it from every front end."""
