"""The batching client: pure policy (``batchclient.policy``) and its asyncio shell."""
