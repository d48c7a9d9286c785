"""District data on disk: the districts registry, label JSON, images, sources (LEVIR-CD, JSON polygons,
GeoTIFF), the HDF5 pack format (writer and reader), the synthetic Seoul generator and the GIS vector outputs.

May import nfed.common only (it knows nothing of models or training).
"""
