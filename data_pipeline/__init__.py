"""bifocal.data_pipeline"""
