"""gRPC server: the engine on its own thread (worker), the MoeShare service, auth, metrics, health, reflection.

Start it with `moeshare serve STORE...` or `moeshare.server.app.serve(argv)`.
"""
