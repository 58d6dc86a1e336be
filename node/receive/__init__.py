"""Stage 1: receive. A pynetdicom Storage SCP that stores and indexes durably."""
