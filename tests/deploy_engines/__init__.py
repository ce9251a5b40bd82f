"""The deploy test (``bash scripts/deploy-test.sh``): deploy/ run by Docker and systemd. Not
collected by pytest (it needs root, starts a Docker daemon and takes minutes); the logic that
needs no daemon is tested in tests/deploy/test_deploy_engines.py."""
