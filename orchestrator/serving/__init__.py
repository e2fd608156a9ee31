"""Deployment on a Ray cluster: the Ray Serve application and the ``concilium cluster`` commands."""
