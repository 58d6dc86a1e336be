"""dicom-node: a DICOM node for hospital AI gateways."""

__version__ = "0.1.0"
