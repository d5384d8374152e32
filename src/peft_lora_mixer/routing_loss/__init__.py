"""The Routing Specialization Loss and the routing statistics: the loss's terms, the collector that watches the
routers during a forward, and the controller the tuner owns to add the loss in training."""
