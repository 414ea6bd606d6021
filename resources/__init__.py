"""Resources shared by the assets and sensors: the lakehouse paths and the SparkSession."""

from resources.lakehouse import TABLES, LakehouseResource, default_data_dir
from resources.spark import SparkSessionResource

__all__ = ["TABLES", "LakehouseResource", "SparkSessionResource", "default_data_dir"]
