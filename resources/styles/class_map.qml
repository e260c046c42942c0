<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<!-- JEM-EO class map template: paletted renderer. The palette is the fallback for class maps without a colour table; classes and names come from the raster. -->
<qgis maxScale="0" version="3.22.16-Białowieża" styleCategories="AllStyleCategories" minScale="1e+08" hasScaleBasedVisibilityFlag="0">
  <flags>
    <Identifiable>1</Identifiable>
    <Removable>1</Removable>
    <Searchable>1</Searchable>
    <Private>0</Private>
  </flags>
  <temporal mode="0" enabled="0" fetchMode="0">
    <fixedRange>
      <start></start>
      <end></end>
    </fixedRange>
  </temporal>
  <customproperties>
    <Option type="Map">
      <Option name="identify/format" value="Value" type="QString"/>
    </Option>
  </customproperties>
  <pipe-data-defined-properties>
    <Option type="Map">
      <Option name="name" value="" type="QString"/>
      <Option name="properties"/>
      <Option name="type" value="collection" type="QString"/>
    </Option>
  </pipe-data-defined-properties>
  <pipe>
    <provider>
      <resampling zoomedInResamplingMethod="nearestNeighbour" maxOversampling="2" enabled="false" zoomedOutResamplingMethod="nearestNeighbour"/>
    </provider>
    <rasterrenderer opacity="1" band="1" type="paletted" nodataColor="" alphaBand="-1">
      <minMaxOrigin>
        <limits>None</limits>
        <extent>WholeRaster</extent>
        <statAccuracy>Estimated</statAccuracy>
        <cumulativeCutLower>0.02</cumulativeCutLower>
        <cumulativeCutUpper>0.98</cumulativeCutUpper>
        <stdDevFactor>2</stdDevFactor>
      </minMaxOrigin>
      <colorPalette>
        <paletteEntry label="class 0" color="#1f77b4" value="0" alpha="255"/>
        <paletteEntry label="class 1" color="#ff7f0e" value="1" alpha="255"/>
        <paletteEntry label="class 2" color="#2ca02c" value="2" alpha="255"/>
        <paletteEntry label="class 3" color="#d62728" value="3" alpha="255"/>
        <paletteEntry label="class 4" color="#9467bd" value="4" alpha="255"/>
        <paletteEntry label="class 5" color="#8c564b" value="5" alpha="255"/>
        <paletteEntry label="class 6" color="#e377c2" value="6" alpha="255"/>
        <paletteEntry label="class 7" color="#7f7f7f" value="7" alpha="255"/>
        <paletteEntry label="class 8" color="#bcbd22" value="8" alpha="255"/>
        <paletteEntry label="class 9" color="#17becf" value="9" alpha="255"/>
        <paletteEntry label="class 10" color="#aec7e8" value="10" alpha="255"/>
        <paletteEntry label="class 11" color="#ffbb78" value="11" alpha="255"/>
      </colorPalette>
    </rasterrenderer>
    <brightnesscontrast brightness="0" gamma="1" contrast="0"/>
    <huesaturation colorizeGreen="128" colorizeOn="0" colorizeRed="255" grayscaleMode="0" saturation="0" colorizeStrength="100" invertColors="0" colorizeBlue="128"/>
    <rasterresampler maxOversampling="2"/>
    <resamplingStage>resamplingFilter</resamplingStage>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
