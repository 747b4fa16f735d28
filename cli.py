def main():
    import featstore.pipelines, featstore.trainers
    print("cli ok", featstore.pipelines.__file__)
