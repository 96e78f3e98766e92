"""Deploying trained models: bundles (``package``), batch scoring (``predict``), the
challenger-vs-champion gate (``gate``) and the GTO/DVC model registry (``registry``)."""
