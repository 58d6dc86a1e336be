"""Query/Retrieve SCP services: C-FIND, C-MOVE and C-GET answered from the index and the forward queue."""
