"""The asynchronous job API over the SDXL server: a durable Redis queue in front of
TorchServe (api, store, dispatcher, webhooks). Not packed into the model archive."""
