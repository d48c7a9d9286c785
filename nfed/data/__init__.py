"""District data on disk, one owner per format: the districts registry (districts), label JSON (labels), image
files and tiles (images), pack inputs LEVIR-CD/JSON/GeoTIFF (sources, geopack, geo), the HDF5 pack format
(packformat; written by packwriter, read by reader, filled by pack), the synthetic Seoul generator (synthstyle,
synthscene, synth) and the GIS vector outputs (polygons, vectors, overlay).

May import nfed.common only (it knows nothing of models or training).
"""
