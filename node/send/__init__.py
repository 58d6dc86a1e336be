"""Stage 7: send. C-STORE/C-ECHO SCU."""
