"""The shop app: the ``Customer`` model, the webhook views and the welcome task."""
